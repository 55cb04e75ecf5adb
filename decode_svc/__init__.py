"""gRPC Decode service: engine in role `decode`, KV receiver and delta streaming.

Empty shell: the disaggregated services issue fills it (ARCHITECTURE.md §2, §6).
"""
