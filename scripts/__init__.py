"""Helpers for people and CI (make key, make report): not pipeline stages, never in dvc.yaml."""
