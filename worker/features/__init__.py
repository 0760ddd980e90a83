"""What producers ask of a job beyond its tokens, each a stage on the event loop with its own state.

A delivered job passes through them in order, once each: `cancels` (a job whose id was
cancelled is answered, not run), `formats` (a response format compiles off the loop while
the job waits outside admission), then admission; while it runs, `stops` watches its tokens
for stop strings. The stages reach the executor, the intake and the answers only through
the callbacks and small interfaces `worker.app` wires: they never import the engine's
internals or the top level, and never load torch.
"""
