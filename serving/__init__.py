"""The serving app's parts; `serve.py` at the top level puts them together (settings → app → uvicorn).

One concept per module, in layers; a module imports only from the layers before its own (tests/test_serve.py checks):

    signature, metrics, background, trees,    what the gate signed, checked; every metric; the thread base; the fast
    admin                                     path; which endpoints answer on which port
    settings                                  the settings object
    schema, registry, drift, prediction_log   records checked into arrays; every MLflow call; PSI; the JSON lines
    intake, model, openapi                    every door's one bounded path from bytes to checked input; load,
                                              check, keep and reload the model; the OpenAPI document
    tabular, responses, scoring_process       records in other protocols' shapes; the shared answers and errors; the
                                              candidate's own low-priority process
    shadow                                    the candidate scored in shadow
    app, docs                                 the endpoints; the /docs page
    mlflow_protocol, v2_protocol              MLflow's scoring protocol and the Open Inference Protocol v2 on app
"""
