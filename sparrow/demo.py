"""`make demo`: placeholder until the built-in synthetic video world lands (issue 5)."""

if __name__ == "__main__":
    print("sparrow demo: the built-in default (synthetic video world, trained target and drafts) "
          "arrives with its issue; `make test` runs the test suite meanwhile.")
