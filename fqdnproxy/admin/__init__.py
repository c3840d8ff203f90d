"""The local admin API: JSON requests over a unix socket, served by the agent, used by the CLI.

One request and one response per connection, each a single JSON object on one line:

    -> {"command": "cache.list", "args": {"endpoint": "demo/frontend"}}
    <- {"ok": true, "result": [...]}        or        {"ok": false, "error": "..."}

The socket is created with mode 0600 in the state directory: only root talks to the agent.
"""

DEFAULT_SOCKET = "/run/fqdnproxy/admin.sock"  # config: state.admin_socket
