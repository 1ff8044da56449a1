"""Pricing: turns usage into exact integer quota units. Pure: imports neither metering nor workers."""

from pricing.usage import InvalidUsage, UsageRecord, UsageSource

__all__ = ["InvalidUsage", "UsageRecord", "UsageSource"]
