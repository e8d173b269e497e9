"""Decode pool: vLLM engine as KV consumer, speculative decoding with TETRIS."""
