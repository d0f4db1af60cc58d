"""The Python-backend models of the served repository (imported only inside the Triton stub).

Each generated model.py sets sys.path and imports `TritonPythonModel` from the module of
the same name here, so the serving code is versioned with specdeploy, not copied.
"""
