"""Alerts: the alerts table, incidents, metric alerts and delivery through sinks."""
