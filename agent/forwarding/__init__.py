"""One data dir, many processes: the owner (the lock holder) and its forwarders.

wire.py frames messages on the owner's Unix socket; owner.py is the lock holder's
listener (acks after the journal commit); forwarder.py is the client side that
agent.start() gives every other process with the same data_dir (or `[agent] connect`);
links.py is its connection (the Unix socket, or a sidecar's HTTP ingest); failover.py
tracks the owner and takes the data dir over when it is gone; spill.py keeps what a
stopping forwarder could not hand over. See docs/multiprocess.md.
"""
