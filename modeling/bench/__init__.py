"""Speed and memory benchmarks of capture against SDPA and eager (tools; never shipped)."""
