"""Turning a run frozen at ExitBootServices into something a real machine can continue."""
