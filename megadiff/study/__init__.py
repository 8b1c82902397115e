"""Design-space studies: fitting scaling and data-mixing laws to tables of runs."""
