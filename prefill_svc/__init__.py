"""gRPC Prefill service: engine in role `prefill` plus the KV sender.

Empty shell: the disaggregated services issue fills it (ARCHITECTURE.md §2, §6).
"""
