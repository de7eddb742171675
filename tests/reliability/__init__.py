"""Reliability and security tests (issue 6; crash and full-disk tests of issue 3)."""
