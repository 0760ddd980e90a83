"""The device's side: build, executor, scheduler, KV, runner, sampling. Never imports nats."""
