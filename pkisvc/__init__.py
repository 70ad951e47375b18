"""pkisvc: versioned certificate management for Salt-managed Kubernetes clusters."""

__version__ = "0.1.0"
