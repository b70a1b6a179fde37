# Makes tests/cli a package ("cli") so its test modules cannot clash by basename with
# test modules of the same name in other test folders.
