"""Localization methods."""
