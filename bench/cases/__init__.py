"""The benchmark cases, one module each: NUMBER, TITLE and run(bench) -> Case."""
