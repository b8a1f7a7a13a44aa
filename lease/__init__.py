"""The flannel-compatible etcd subnet manager: config, lease records, allocation, subnet.env, watch."""
