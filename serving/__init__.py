"""The serving app's parts; `serve.py` at the top level puts them together and runs them.

Imports run one way: app → model → registry, trees, drift; schema, metrics and settings import none of the others
but settings.
"""
