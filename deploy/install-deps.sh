#!/bin/sh
# Dependency layer of both Docker targets: resolve and install what pyproject.toml asks for,
# using empty packages so that a code change does not invalidate this layer. $1: extras ("" or "ray").
set -eu
mkdir server engine executors workers
touch server/__init__.py engine/__init__.py executors/__init__.py workers/__init__.py
pip install ".${1:+[$1]}"
pip uninstall -y imagegen
rm -r server engine executors workers
