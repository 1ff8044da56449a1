"""``metering demo``: the bundled samples, a simulated gateway's traffic, the closes and what is printed."""
