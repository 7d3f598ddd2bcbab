"""The RPC edge: UNIX socket, newline-delimited JSON-RPC 2.0, params, error mapping."""
