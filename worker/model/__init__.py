"""The Llama-family decoder, checkpoint loading and tokenizers. Never imports nats."""
