"""Synthetic-task experiments (the MQAR sweep); the tasks themselves live in lm/data/synthetic."""
