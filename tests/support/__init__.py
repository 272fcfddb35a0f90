"""What the tests run against but do not test themselves: the local Alpaca server (REST and
websocket on 127.0.0.1), the multi-node placement cluster and GPU-share probe scripts, and the
scheduler's workflow targets. Nothing here reaches beyond 127.0.0.1."""
