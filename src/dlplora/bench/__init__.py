"""Speed benchmarks, every figure a ratio of contenders measured side by side in one run: fused inference vs PEFT
(:mod:`.fusion`), the server with batching on vs off (:mod:`.serve`), our training step vs a naive loop
(:mod:`.train`)."""
