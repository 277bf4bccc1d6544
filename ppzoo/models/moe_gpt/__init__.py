"""MoE-GPT: a GPT-style decoder with mixture-of-experts feed-forward layers (GShard, Switch, TA-MoE gates)."""
