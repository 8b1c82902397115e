"""Learned unmasking policies: the network, its actions, GRPO training (``megadiff policy``)."""
