"""Count UDP datagrams arriving on PORT for SECONDS, then print the count (a pod-side witness)."""

import socket
import sys
import time

sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", int(sys.argv[1])))
sock.settimeout(0.1)
print("listening", flush=True)
deadline, count = time.monotonic() + float(sys.argv[2]), 0
while time.monotonic() < deadline:
    try:
        sock.recv(65535)
        count += 1
    except TimeoutError:
        pass
print("received", count, flush=True)
