import actstore


def test_tiny_store_opens(tiny_store):
    st = actstore.open_store(tiny_store)
    assert st.models == ["tiny"]
    assert st.layers("tiny") == [0, 1, 2, 3]
    assert st.activations("tiny", 2).shape[1] == 32
