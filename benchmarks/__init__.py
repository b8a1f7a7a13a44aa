"""udpflannel vs kernel VXLAN vs host-gw on one machine, in network namespaces: ``python -m benchmarks``.

``lab`` builds the two-node lab and the dataplanes (the rows), ``measure`` runs the traffic and reads
/proc, ``runner`` drives repeats and traffic groups, ``report`` aggregates and writes JSON, Markdown
and plots. See benchmarks/README.md.
"""
