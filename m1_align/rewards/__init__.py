"""Rewards of sampled answers: rules for verifiable answers, a learned reward model for the rest, and the router."""
