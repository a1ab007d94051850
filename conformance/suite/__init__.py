"""The conformance tests, one file per spec area. Run: pytest --pyargs conformance.suite --peft-impl=NAME"""
