"""Alignment: SFT, DPO, GRPO, expert iteration and verifiable rewards."""
