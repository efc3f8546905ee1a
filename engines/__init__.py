"""Backends behind one interface: name, available() -> (ok, reason), build(component, case) -> Runner."""
