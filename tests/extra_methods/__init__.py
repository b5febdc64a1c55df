"""Methods that live outside conceptbench, named in a config by import path (extra_methods.bitfit)."""
