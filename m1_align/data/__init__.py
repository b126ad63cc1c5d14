"""Offline medical data -> datasets, user data formats, chat templates and prompts, rule definitions, tokenizer."""
