"""All metadata lives in setup.cfg; this file exists for tools that still call it."""

from setuptools import setup

setup()
