"""Checking estimates: phantoms with known motion and errors against it."""
