"""The typed run config: what each key declares."""

from pathgan.config import OnResume, declared_on_resume


def test_every_config_key_declares_what_a_resume_may_do():
    undeclared = [key for key, meaning in declared_on_resume().items() if meaning is None]
    assert not undeclared, (f"{undeclared}: declare each in pathgan/config.py with held(...), "
                            "recipe(...), length(...) or setting(...) (OnResume says which)")
    meaning = declared_on_resume()
    assert meaning["model.kind"] is OnResume.HELD and meaning["model.ngf"] is OnResume.HELD
    assert meaning["train.batch_size"] is OnResume.RECIPE
    assert meaning["train.max_steps"] is OnResume.LENGTH
    assert meaning["log.every"] is OnResume.SETTING
