"""Package discovery for the three source roots (pgraft/, core/, apps/).

pyproject.toml maps ``pgraft.core`` -> ``core/`` and ``pgraft.apps`` -> ``apps/``; setuptools
needs every subpackage listed for a regular (non-editable) wheel, so we generate the list here
instead of hand-maintaining it (a hand list silently drops new subpackages from the wheel).
"""

from setuptools import find_packages, setup

ROOTS = {"pgraft": "pgraft", "pgraft.core": "core", "pgraft.apps": "apps"}

packages = []
package_dir = {}
for name, folder in ROOTS.items():
    packages.append(name)
    package_dir[name] = folder
    for sub in find_packages(folder):
        packages.append(f"{name}.{sub}")
        package_dir[f"{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

setup(packages=packages, package_dir=package_dir)
