# Makes tests/dsl a package ("dsl") so its test modules cannot clash by basename with
# test modules of the same name in other test folders.
