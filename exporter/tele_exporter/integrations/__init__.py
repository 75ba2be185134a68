"""Integrations with other training libraries; each imports its library lazily, only when used."""
