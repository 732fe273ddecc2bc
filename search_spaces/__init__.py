"""The shipped sweep axes, as YAML files in Ray Tune's grammar; they travel with the package (a wheel too)."""
