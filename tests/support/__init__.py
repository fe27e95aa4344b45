"""What tests (and the benchmark) share: processes, ports, SSE, stream reads, the page's script.

- `procs`: the one process harness (Valkey, the mock model, gateway, worker, serve)
- `net`: free ports
- `sse`: the Server-Sent Events parser
- `streams`: what Redis holds for an answer
- `web`: the scripted answer and checks of the browser tests
- `sockets`: a recording Socket.IO client; `proxy`: a TCP proxy that cuts connections
"""

__all__: list[str] = []
