"""One data dir, many processes: the owner (the lock holder) and its forwarders.

wire.py frames messages on the data dir's Unix socket; owner.py is the lock holder's
listener (acks after the journal commit); forwarder.py is the client side that
agent.start() gives every other process with the same data_dir. See docs/multiprocess.md.
"""
