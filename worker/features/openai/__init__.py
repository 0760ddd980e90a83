"""The OpenAI Batch API at the edges: a request line becomes the project's own Job, and the
job's Result becomes a batch output line.

Rule: the engine never sees OpenAI. `request` translates a line into a `Job` plus a `Call`
(what the output line will need: the custom id, the endpoint, the model name, how to show
logprobs and tool calls) at validation; `response` turns the internal Result into the
output line when it is answered; `tools` parses tool calls out of the reply's text. A field
that cannot be honoured is refused with a 400 line that names it, never ignored.
"""
