"""The serving app's parts; `serve.py` at the top level puts them together (settings → app → uvicorn).

One concept per module, in layers; a module imports only from the layers before its own (tests/test_serve.py checks):

    settings, metrics, background, trees,     the settings object; every metric; the thread base; the fast path;
    admin                                     which endpoints answer on which port
    schema, registry, drift, prediction_log   records → arrays and OpenAPI; every MLflow call; PSI; the JSON lines
    body, model, tabular                      reading a /predict request; load, check, keep and reload the model;
                                              records in other protocols' shapes
    app, docs                                 the endpoints and their error answers; the /docs page
    mlflow_protocol, v2_protocol              MLflow's scoring protocol and the Open Inference Protocol v2 on app
"""
