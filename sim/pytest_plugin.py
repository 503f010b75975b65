"""pytest plugin of the lazycluster simulator (fixtures are added with the simulator)."""
