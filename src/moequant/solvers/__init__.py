"""Solvers: RTN, GPTQ/BlockLDLQ error feedback, incoherence processing."""
