"""Flower ClientApp: each client fine-tunes the global model on its own partition and returns τ_i."""

from clients.app import app

__all__ = ["app"]
